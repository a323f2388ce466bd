"""The embeddable runtime. Imports without torch: backends load their libraries lazily."""
