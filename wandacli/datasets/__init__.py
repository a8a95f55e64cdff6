"""The small data sets wandacli ships, so that a fresh install works offline: see README.md in
this folder for each file's origin, licence, row count and sha256. `wandacli.data` reads them."""
