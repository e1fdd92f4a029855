"""Lightning callbacks for corrpo runs."""
