"""One hospital's side: which site it is, its rounds, its state folder, its audit log."""
