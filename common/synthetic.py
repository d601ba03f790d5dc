"""`python -m common.synthetic`, as the README documents it: synthetic data in each recipe's real schema (`common.fixtures.synthetic`)."""

from common.fixtures.synthetic import main

if __name__ == "__main__":
    main()
