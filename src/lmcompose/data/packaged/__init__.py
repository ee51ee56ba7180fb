"""Data shipped with lmcompose (package data, no code): the WikiText-2 test split and a C4 calibration sample,
xz-compressed. Sources, licenses and checksums: README.md in this folder (and DATA_LICENSES.md at the
repository root). Read through `lmcompose.data.text.packaged_file`."""
