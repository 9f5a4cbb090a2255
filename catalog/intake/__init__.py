"""Untrusted input: every uploaded or fetched image passes through `images.image_validate` before anything stores
or encodes it. Uploads are hostile until validated: wrong formats, huge files, decompression bombs, truncated data
and EXIF tricks, zip slips and zip bombs, manifests of any shape, and image URLs that point into our own network
all end here as an `IntakeError` with a message fit for a 400 response or a rejected manifest row.

    images     one image: validate, re-encode, crop a query
    zips       zip archives of catalog images, read with counted, capped sizes
    manifests  catalog manifests (CSV or JSON lines) to rows and per-row errors
    fetch      image URLs, fetched under the address and size policy
"""

from __future__ import annotations

READ_BLOCK = 64 * 1024  # untrusted bytes are read in blocks, so a size cap stops a read at most one block past it


class IntakeError(ValueError):
    """The input is unusable; the message says why, in words a shopper or merchant can act on."""
