from labcnn.cli import main

raise SystemExit(main())
