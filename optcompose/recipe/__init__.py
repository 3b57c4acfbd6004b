"""Training-recipe pieces built on the transformations: plateau control, ..."""
