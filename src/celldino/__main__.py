from celldino.cli import main

raise SystemExit(main())
