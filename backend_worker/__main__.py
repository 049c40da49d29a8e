from backend_worker.main import main

raise SystemExit(main())
