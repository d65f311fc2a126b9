"""Reporting: the results table and figures, study grids, model inspection pages."""
