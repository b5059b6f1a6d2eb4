"""Select: which structures of an evaluation go to DFT, as small pure functions over tables and features."""
