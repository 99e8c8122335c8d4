"""Embeddings of the training images, a Faiss index over them, kNN classification and its fusion
with the classifier (the index stage), and enrolment of new SKUs."""
