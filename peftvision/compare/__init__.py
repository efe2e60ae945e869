"""`compare`: jobs, their plan, the engines that run them (local, Ray) and the comparison's report."""
