"""`python -m common.launch`, as the README documents it: torchrun that passes preemption through (exit 75) (`common.training.launch`)."""

from common.training.launch import main

if __name__ == "__main__":
    main()
