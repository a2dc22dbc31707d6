"""Built-in training tasks, each written against the public interface in raytrain_spot/loop/task.py."""
