"""`make app`: a Streamlit app over a study's outputs (pipeline/app/main.py is the script `streamlit run` runs)."""
