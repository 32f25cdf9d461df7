"""The experiment of issue 7: conditions x seeds on the scene world, and its report."""
