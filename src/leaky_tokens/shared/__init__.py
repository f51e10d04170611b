"""Infrastructure shared by two or more services; no business rules live here."""
