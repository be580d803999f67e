"""imgclf: turn a folder of images into a trained, evaluated, exported image classifier."""

__version__ = "0.1.0"
