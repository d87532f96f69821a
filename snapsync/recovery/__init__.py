"""Getting data back: rollback in place, restore from offsite, drills that prove a restore works."""
