from jitrelay.cli import main

raise SystemExit(main())
