"""`python -m eval --model DIR (--world DIR | --pope FILE... --images DIR) [--out FILE] [--limit N]`."""

from eval.run import main

if __name__ == "__main__":
    main()
