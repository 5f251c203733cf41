"""course_lib: the tested library behind the hands-on diffusion course. One module per idea the lessons teach."""
from .exercises import check, progress
from .runtime import budget, get_device, is_quick, seed_everything

__version__ = "0.1.0"
__all__ = ["check", "progress", "budget", "get_device", "is_quick", "seed_everything"]
