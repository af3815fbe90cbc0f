"""Crash safety and security (issue 6): power loss, kill -9 at every step, syscall order,
fault matrix, real disk-full and hostile mailboxes."""
