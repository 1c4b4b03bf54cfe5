"""Package lifecycle tooling behind ``posttrain new`` and ``posttrain promote``: the scaffold and promotion.

Not part of the plugin API: these modules serve the command line and may change in any release.
"""
