"""Subject image loading and validation: EXIF, modes, size, corruption, duplicates.

`decode` opens one photo safely, `images` checks a folder and prepares training images (torch),
`similarity` finds duplicates. Nothing is imported here, so reading `decode`'s limits stays cheap.
"""
