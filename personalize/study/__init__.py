"""The pairwise user study: tasks, serving, answer storage, statistics and report."""
