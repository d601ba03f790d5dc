"""`python -m common.export`, as the README documents it: a LoRA run merged into its base, or a full run, as an official-format model folder (`common.outputs.export`)."""

from common.outputs.export import main

if __name__ == "__main__":
    main()
