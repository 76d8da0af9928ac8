"""The storage-agent API: derive, datakey, encrypt, decrypt, rewrap."""
