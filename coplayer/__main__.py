from coplayer.cli import main

raise SystemExit(main())
