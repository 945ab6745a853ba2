from flexoraa.cli import main

raise SystemExit(main())
