"""Report: tables, selected structure files, Excel, plots and chemiscope views of a run."""
