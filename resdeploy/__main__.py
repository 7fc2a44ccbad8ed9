from resdeploy.pipeline.cli import main

raise SystemExit(main())
