"""What a device id may be: the van's config checks its own, the receiver the ones it provisions.

One pattern on both sides, because the id becomes an MQTT topic level, a broker account
name and a file name: a character either side accepts and the other refuses would lock a
van out.
"""

from __future__ import annotations

import re

# Used with fullmatch: "$" alone would also accept a trailing newline.
DEVICE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
