"""`python -m common.predict`, as the README documents it: answers of a trained model for one prompt or a whole file (`common.outputs.predict`)."""

from common.outputs.predict import main

if __name__ == "__main__":
    main()
