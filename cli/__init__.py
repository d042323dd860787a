"""The click front end of combireg (installed as ``combireg.cli``): parsing and presentation only."""
