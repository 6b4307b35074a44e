"""`python -m pipeline`, the form `accelerate launch -m pipeline ...` runs."""

import os
import sys

from pipeline.cli import main

if "TORCHELASTIC_ERROR_FILE" in os.environ:  # under torchrun: a rank's uncaught error heads the launcher's summary
    from torch.distributed.elastic.multiprocessing.errors import record

    main = record(main)
sys.exit(main())
