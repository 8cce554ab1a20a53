"""Getting images out of the image ring: replication to another server (``send`` / ``recv``, wire
format in ``wire``), the Array-1.0 live stream for viewers (``live``) and the PNG preview
(``preview``). Import the submodules directly; this package imports nothing heavy on its own.
"""
