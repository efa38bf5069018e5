"""Package marker: these workflow files ship inside the wheel as package data."""
