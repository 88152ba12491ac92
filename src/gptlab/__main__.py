"""``python -m gptlab ...`` (and ``torchrun --nproc_per_node=N -m gptlab train ...``): the command line."""

from gptlab.cli import main

if __name__ == "__main__":
    main()
