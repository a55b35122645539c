from monitoring.server import main

raise SystemExit(main())
