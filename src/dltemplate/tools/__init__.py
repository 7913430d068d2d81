"""Small command-line helpers: config comparator and parameter counter."""
