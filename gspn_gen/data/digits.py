"""The embedded default data: scikit-learn's bundled handwritten digits, with the fixed train/val split
the evaluation suite defines (`fid_eval.digits_data`), so that the generator trains on the images
`digits:val` holds out.
"""

from fid_eval.digits_data import CLASS_NAMES, NUM_CLASSES, SUPPORTED_SIZES, load_digits_split

__all__ = ["CLASS_NAMES", "NUM_CLASSES", "SUPPORTED_SIZES", "load_digits_split"]
