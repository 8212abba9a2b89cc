"""`make demo` / `python -m hbat.demo`: the embedded default run of the trainer (same as `hbat train`).

No download, CPU: a generated task whose two objectives conflict, a tiny Llama pre-trained on generated
text, then two-stage SFT -> DPO and HBAT side by side, ending with the summary table. Extra arguments are
those of `hbat train` (e.g. `--set output_dir=runs/x`).
"""
import sys

from .trainer.run import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
