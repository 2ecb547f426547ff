"""LLM backends behind one interface (`ChatEngine`), and the judge that uses them."""
