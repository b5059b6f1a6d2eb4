"""Score: open the seed files lazily, fit the family reference, compute and calibrate every score."""
