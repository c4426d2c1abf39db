from edgellm.cli.main import main

raise SystemExit(main())
