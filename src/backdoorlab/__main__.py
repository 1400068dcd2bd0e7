from backdoorlab.cli import main

raise SystemExit(main())
