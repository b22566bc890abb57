"""`python -m lvlm_jax` is the `lvlm` command."""

import sys

from lvlm_jax.cli import main

sys.exit(main())
