from gdbklp.cli import main

raise SystemExit(main())
