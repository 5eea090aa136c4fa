"""Data: dataset sources, shard writing and streaming, paired transforms."""

import cv2  # opencv-python-headless: image decoding (sample.py) and the training warps (transforms.py)

# One thread: the data path runs one process per core (loader workers, shard builders), so
# OpenCV's own pool would only oversubscribe the cores (measured: 9% fewer training steps/s).
# It is set here, when the package is first imported, because the pool is not fork-safe:
# changing it in a forked loader worker after the parent has used it hangs.
cv2.setNumThreads(1)
