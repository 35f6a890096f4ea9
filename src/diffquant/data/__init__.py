"""Reading image datasets without torchvision: image folders, zipped image folders, and the
packed-JPEG ``.npz`` format used to carry CIFAR-10-JPEG to the GPU machine.

Every reader returns an :class:`ImageArrays` — ``images`` uint8 (N, H, W, C), ``labels`` int64 (N,),
``classes`` (sorted class-folder names; the label is the index into it) and ``names`` (the
relative path of each image, for traceability). Images are ordered by (class, file name), so the
order does not depend on how the archive happens to be laid out.

    from diffquant.data import load_images
    train = load_images("../shared/data/cifar10-jpeg/train.zip")   # CIFAR-10-JPEG train split
    train.images.shape  # (50000, 32, 32, 3)

The CIFAR-10-JPEG copy is lossy (JPEG quality 75; see its README): it is its own dataset,
called "CIFAR-10-JPEG" throughout this project.
"""
from diffquant.data.folders import (
    IMAGE_EXTENSIONS,
    ImageArrays,
    list_folder,
    list_zip,
    load_images,
    read_folder,
    read_zip,
)
from diffquant.data.packed import PACKED_FORMAT, pack_jpeg_zip, read_packed, unpack_jpeg_bytes

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageArrays",
    "PACKED_FORMAT",
    "list_folder",
    "list_zip",
    "load_images",
    "pack_jpeg_zip",
    "read_folder",
    "read_packed",
    "read_zip",
    "unpack_jpeg_bytes",
]
